//! The pod's side of "the app sees its client's address". The ztunnel
//! dials the app inside the pod from the client's IP (a transparent socket
//! with the ztunnel's mark, see the ztunnel's `proxy::orig_src`); the
//! app's replies go to that IP, which the pod's main table routes out of
//! eth0. These rules bring them back to the ztunnel's socket:
//!
//! - output (raw): the ztunnel's dials from an address not the pod's
//!   track their original direction in their own conntrack zone, so they
//!   never join a client's connection that has the same tuple (see
//!   [`chains`]);
//! - prerouting (mangle): a packet arriving on loopback with the ztunnel's
//!   mark opening a connection (original direction, new) is the ztunnel
//!   dialing something in the pod; its connection gets conntrack mark
//!   [`REPLY_MARK`];
//! - output (route): a reply-direction packet of such a connection (the
//!   app answering) gets packet mark [`REPLY_MARK`], so it is routed again;
//! - policy routing: mark [`REPLY_MARK`] looks up table [`ROUTE_TABLE`],
//!   whose one route, `local default dev lo`, delivers it within the pod,
//!   to the ztunnel's socket.
//!
//! Nothing else carries that mark: the app's own connections (captured
//! outbound, DNS), probes from the node, and traffic of a pod whose
//! inbound is not captured never pass the ztunnel's marked dials. A
//! connection the ztunnel makes to the pod's own address is marked too,
//! and its replies, local already, stay local.
//!
//! The chains live in the pod's table (`crate::rules`) and go with it; the
//! rule and route are installed after it and removed before it, so the
//! rule (which the ztunnel's per-dial route check sees) exists only while
//! the chains do. The table also holds a guard ([`guard`]): packets of the
//! ztunnel's transparent dials never leave through anything but loopback,
//! so a missing route stalls them and never sends them out of eth0.
//!
//! A process in the pod with CAP_NET_ADMIN that flushes the pod's
//! nftables (the guard with it) breaks original source for its pod: the
//! route check still sees the rule, and its app's replies to a client's
//! address would be routed out of eth0 instead of back to the ztunnel.
//! Such a process can send anything from its pod anyway.
//!
//! The mark (0x111), the rule's priority (32764) and the table (100) are
//! the values Istio's in-pod rules use: do not run this agent alongside
//! Istio's CNI on the same node.

/// The ztunnel's mark (its sockets carry it in node mode).
const MARK: u32 = mesh_core::config::INPOD_MARK;

/// The mark of the app's replies to the ztunnel's connections (as Istio's
/// in-pod rules use).
pub const REPLY_MARK: u32 = mesh_core::config::ORIG_SRC_REPLY_MARK;
/// The routing table that sends them to loopback.
pub const ROUTE_TABLE: u32 = mesh_core::config::ORIG_SRC_TABLE;
/// The policy rule's priority: before the main table's (32766).
pub const RULE_PRIORITY: u32 = 32764;

/// The connection-tracking zone of the original direction of the
/// ztunnel's dials from a client's address (see [`chains`]).
pub const DIAL_ZONE: u16 = 1;

/// The chains, for the pod's nftables table.
///
/// `orig_src_zone` keeps the ztunnel's dials from a client's address off
/// the entries of the client's own connections. The ztunnel binds a port
/// that no socket in the pod holds, but connection tracking knows more:
/// a plaintext connection C:p to the app, redirected to 15006, leaves an
/// entry whose original tuple is C:p to the app, with no socket of that
/// tuple. A dial from C:p to the app (the kernel may pick p) would join
/// that entry, be redirected to 15006 by its NAT and take its marks: both
/// connections die. In zone [`DIAL_ZONE`] (original direction only) the
/// dial's original tuple cannot match an entry of the default zone; its
/// reply tuple (the app answering) stays in the default zone, where no
/// redirected connection's reply tuple (from 15006) can equal it. A dial
/// from the pod's own address (a local source) stays in the default zone,
/// as before.
pub fn chains() -> String {
    format!(
        "  chain orig_src_zone {{
    type filter hook output priority raw; policy accept;
    meta mark {MARK} oifname \"lo\" fib saddr type != local ct original zone set {DIAL_ZONE}
  }}
  chain orig_src_mark {{
    type filter hook prerouting priority mangle; policy accept;
    iifname \"lo\" meta mark {MARK} ct direction original ct state new ct mark set {REPLY_MARK}
  }}
  chain orig_src_reply {{
    type route hook output priority mangle; policy accept;
    ct direction reply ct mark {REPLY_MARK} meta mark set {REPLY_MARK}
  }}
"
    )
}

/// The chain that keeps the ztunnel's dials in the pod whatever the
/// routing: a packet of a connection marked as one of them (conntrack mark
/// [`REPLY_MARK`]) leaves through loopback or not at all. Without the
/// rule and route (being replaced, removed, or flushed by someone else)
/// the app's replies to a client's address would otherwise go out of
/// eth0, in cleartext; with this they stall instead. It is part of every
/// table the agent installs (with or without the chains that mark), so a
/// fallback keeps it for the connections already marked.
///
/// It also drops a transparent dial of the ztunnel itself (its mark, a
/// source that is not one of the pod's addresses) that would leave
/// through anything but loopback: such a dial is only ever meant for
/// the app inside the pod.
pub fn guard() -> String {
    format!(
        "  chain orig_src_guard {{
    type filter hook postrouting priority filter; policy accept;
    ct mark {REPLY_MARK} oifname != \"lo\" drop
    meta mark {MARK} fib saddr type != local oifname != \"lo\" drop
  }}
"
    )
}

fn family(v6: bool) -> &'static str {
    if v6 { "-6" } else { "-4" }
}

/// The policy rule's selector and action.
fn rule() -> String {
    format!("fwmark {REPLY_MARK} lookup {ROUTE_TABLE} pref {RULE_PRIORITY}")
}

/// Whether `ip rule show` printed the rule.
fn has_rule(shown: &str) -> bool {
    let prefix = format!("{RULE_PRIORITY}:");
    let want = format!("fwmark {REPLY_MARK:#x} lookup {ROUTE_TABLE}");
    shown
        .lines()
        .any(|l| l.starts_with(&prefix) && l.contains(&want))
}

/// The `ip` command deleting the rule.
fn rule_removal() -> String {
    format!("rule del {}\n", rule())
}

/// The `ip` command deleting the route of one family.
fn route_removal(v6: bool) -> String {
    let default = if v6 { "::/0" } else { "0.0.0.0/0" };
    format!("route del local {default} dev lo table {ROUTE_TABLE}\n")
}

/// Runs `ip` (inside the pod) with these arguments and this batch on
/// its stdin.
pub trait RunIp {
    type Error: std::fmt::Display;
    fn run_ip(&self, args: &[&str], batch: &str) -> Result<(), Self::Error>;
    /// Runs `ip args` and returns what it printed.
    fn ip_output(&self, args: &[&str]) -> Result<String, Self::Error>;
}

/// The route, then the rule when it is missing. The route's `replace` is
/// one change; the rule is never deleted to be re-added (live transparent
/// connections would lose their replies' routing in between).
fn install_family<R: RunIp>(run: &R, v6: bool) -> Result<(), R::Error> {
    let (f, default) = (family(v6), if v6 { "::/0" } else { "0.0.0.0/0" });
    let route = format!("route replace local {default} dev lo table {ROUTE_TABLE}\n");
    run.run_ip(&[f, "-batch", "-"], &route)?;
    let pref = RULE_PRIORITY.to_string();
    let shown = run.ip_output(&[f, "rule", "show", "pref", &pref])?;
    if !has_rule(&shown) {
        run.run_ip(&[f, "-batch", "-"], &format!("rule add {}\n", rule()))?;
    }
    Ok(())
}

/// Installs (or re-installs) the rule and route: IPv4 always, IPv6 too;
/// an IPv6 failure is an error only for a pod with an IPv6 address
/// (`v6`): a pod without one has no IPv6 clients.
pub fn install<R: RunIp>(run: &R, v6: bool) -> Result<(), R::Error> {
    install_family(run, false)?;
    match install_family(run, true) {
        Err(e) if !v6 => {
            tracing::debug!(error = %e, "no IPv6 reply routing in the pod (IPv6 off?)")
        }
        r => r?,
    }
    Ok(())
}

/// Removes the rule and route (the pod leaves the mesh), the rule first.
/// A rule that is not there is no failure (a pod without original
/// source has none); a rule that is there and cannot be deleted is. An
/// IPv6 stack that `ip` cannot reach has no rule (nothing could add one).
/// A route left behind is harmless (only the rule leads to its table).
pub fn remove<R: RunIp>(run: &R) -> Result<(), R::Error> {
    let v4 = remove_family(run, false);
    let v6 = remove_family(run, true);
    v4.and(v6)
}

fn remove_family<R: RunIp>(run: &R, v6: bool) -> Result<(), R::Error> {
    let f = family(v6);
    let pref = RULE_PRIORITY.to_string();
    let shown = match run.ip_output(&[f, "rule", "show", "pref", &pref]) {
        Ok(s) => s,
        Err(e) if v6 => {
            tracing::debug!(error = %e, "no IPv6 rules in the pod (IPv6 off?)");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if has_rule(&shown) {
        run.run_ip(&[f, "-batch", "-"], &rule_removal())?;
    }
    if let Err(e) = run.run_ip(&[f, "-batch", "-"], &route_removal(v6)) {
        tracing::debug!(error = %e, "no reply route to remove");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_ztunnels_connections_over_loopback_are_marked() {
        let c = chains();
        assert!(
            c.contains(
                "iifname \"lo\" meta mark 1337 ct direction original ct state new ct mark set 273"
            ),
            "{c}"
        );
        assert!(
            c.contains(
                "meta mark 1337 oifname \"lo\" fib saddr type != local ct original zone set 1"
            ),
            "{c}"
        );
        assert!(
            c.contains("ct direction reply ct mark 273 meta mark set 273"),
            "{c}"
        );
        assert!(guard().contains("ct mark 273 oifname != \"lo\" drop"));
        assert!(has_rule("32764:\tfrom all fwmark 0x111 lookup 100\n"));
        assert!(!has_rule("32764:\tfrom all fwmark 0x112 lookup 100\n"));
        assert!(!has_rule("32765:\tfrom all fwmark 0x111 lookup 100\n"));
        assert_eq!(
            rule_removal(),
            "rule del fwmark 273 lookup 100 pref 32764\n"
        );
        assert!(
            guard().contains("meta mark 1337 fib saddr type != local oifname != \"lo\" drop"),
            "{}",
            guard()
        );
    }
}
