//! The fence of a captured pod whose ports the agent cannot vouch for
//! (`agent::fenced`): a table of its own beside the pod's redirect table,
//! which rejects every opening the redirect table sent to a ztunnel port
//! (`ct status dnat`: the in-pod table is the only NAT in the pod) and
//! every opening to the HBONE port (which is not redirected), with a TCP
//! reset, and redirected DNS over UDP with an ICMP error. Connections open
//! before it stay; nothing is let through un-meshed: the redirect table is
//! untouched. Lifting it deletes the table.

use mesh_core::config::HBONE_PORT;
use mesh_core::netns::Netns;

use crate::rules::{self, RulesError};

pub const TABLE: &str = "ztunnel-fence";

/// Matches the first segment of a TCP connection only.
const OPENING: &str = "tcp flags & (syn | ack) == syn";

/// The fence's table.
pub fn table() -> String {
    format!(
        "table inet {TABLE} {{
  chain output {{
    type filter hook output priority filter; policy accept;
    ct status dnat {OPENING} reject with tcp reset
    ct status dnat meta l4proto udp reject
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    ct status dnat {OPENING} reject with tcp reset
    tcp dport {HBONE_PORT} {OPENING} reject with tcp reset
  }}
}}
"
    )
}

/// The transaction that deletes the fence, whether or not it is there.
pub fn lift_script() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Puts up (or replaces) the fence in a pod.
pub fn put_up(netns: &Netns) -> Result<(), RulesError> {
    rules::nft(netns, &format!("{}{}", lift_script(), table()))
}

/// Lifts the fence.
pub fn lift(netns: &Netns) -> Result<(), RulesError> {
    rules::nft(netns, &lift_script())
}

/// Whether the pod has a fence (an agent from before a restart put it up).
pub fn present(netns: &Netns) -> bool {
    rules::nft(netns, &format!("list table inet {TABLE}\n")).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only what the redirect table redirected, and HBONE, is rejected:
    /// openings alone, and nothing accepted past them.
    #[test]
    fn the_fence_rejects_redirected_openings_and_hbone_only() {
        let t = table();
        assert!(!t.contains("accept\n    ct"), "{t}");
        let rejects: Vec<&str> = t.lines().filter(|l| l.contains("reject")).collect();
        assert_eq!(rejects.len(), 4, "{t}");
        for r in rejects {
            assert!(
                r.contains("ct status dnat") || r.contains("tcp dport 15008"),
                "{r}"
            );
        }
        assert!(lift_script().ends_with("delete table inet ztunnel-fence\n"));
    }
}
