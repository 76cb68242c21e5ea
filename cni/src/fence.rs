//! The fence of a captured pod whose ports the agent cannot vouch for
//! (`agent::fenced`): a table of its own beside the pod's redirect table,
//! which rejects every opening the redirect table sent to a ztunnel port
//! (`ct status dnat`: the in-pod table is the only NAT in the pod) and
//! every opening made straight to a ztunnel port (HBONE, which is not
//! redirected, and the others: a REDIRECT to the address a packet already
//! had leaves no DNAT status), with a TCP reset, and redirected or direct
//! DNS over UDP with an ICMP error. Connections open
//! before it stay; nothing is let through un-meshed: the redirect table is
//! untouched. Lifting it deletes the table.

use mesh_core::config::{DNS_PORT, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
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
    tcp dport {{ {OUTBOUND_PORT}, {INBOUND_PLAINTEXT_PORT}, {HBONE_PORT}, {DNS_PORT} }} {OPENING} reject with tcp reset
    udp dport {DNS_PORT} reject
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

/// Whether the pod has its fence, whole (an agent from before a restart
/// put it up; a process of the pod's with NET_ADMIN may have deleted or
/// replaced it since).
pub fn present(netns: &Netns) -> bool {
    rules::nft_output(netns, &format!("list table inet {TABLE}\n")).is_ok_and(|l| intact(&l))
}

/// Whether `listing` (the fence's table as `nft list` prints it) is the
/// fence as put up: each of its rejects, and no other rule or flag (an
/// accept, a jump, `flags owner` of a table a process of the pod made).
pub(crate) fn intact(listing: &str) -> bool {
    let rejects = |t: &str| t.lines().filter(|l| l.contains("reject")).count();
    let other = listing.lines().map(str::trim).any(|l| {
        !(l.is_empty()
            || l.starts_with("table ")
            || l.starts_with("chain ")
            || l.starts_with("type ")
            || l.starts_with('}')
            || l.contains("reject"))
    });
    rejects(listing) == rejects(&table()) && !other
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only what the redirect table redirected, the ztunnel's own ports,
    /// and HBONE, are rejected: openings alone, and nothing accepted past
    /// them.
    #[test]
    fn the_fence_rejects_redirected_openings_and_the_ztunnel_ports_only() {
        let t = table();
        assert!(!t.contains("accept\n    ct"), "{t}");
        let rejects: Vec<&str> = t.lines().filter(|l| l.contains("reject")).collect();
        for r in &rejects {
            assert!(r.contains("ct status dnat") || r.contains("dport"), "{r}");
        }
        assert!(lift_script().ends_with("delete table inet ztunnel-fence\n"));
    }

    /// A connection made straight to a ztunnel port in a fenced pod (no
    /// DNAT status: a REDIRECT to the address it already had changes
    /// nothing) is refused too. Failed first: the input chain rejected
    /// only DNATed openings and HBONE, so a process of the pod's listening
    /// on 127.0.0.1:15001 got it.
    #[test]
    fn a_direct_opening_to_a_ztunnel_port_is_refused() {
        let refused = std::thread::spawn(|| {
            // SAFETY: moves this thread alone into a new netns.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "not root?");
            let netns = Netns::open("/proc/thread-self/ns/net").expect("own netns");
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("ip");
            assert!(up.success());
            put_up(&netns).expect("the fence goes up");
            [15001u16, 15006, 15053]
                .into_iter()
                .map(|port| {
                    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                    let _l = std::net::TcpListener::bind(addr).expect("bound");
                    let r = std::net::TcpStream::connect(addr);
                    (port, r.map(drop).map_err(|e| e.kind()))
                })
                .collect::<Vec<_>>()
        })
        .join()
        .expect("the test thread");
        for (port, r) in refused {
            assert_eq!(r, Err(std::io::ErrorKind::ConnectionRefused), ":{port}");
        }
    }

    /// A table of the fence's name that is not the fence (a process of
    /// the pod's with NET_ADMIN made it first, empty) is not taken for it.
    #[test]
    fn an_empty_table_of_the_fences_name_is_no_fence() {
        assert!(intact(&table()));
        let empty = format!("table inet {TABLE} {{\n\tflags owner\n}}\n");
        assert!(!intact(&empty));
        let opened = table().replacen("reject with tcp reset", "accept", 1);
        assert!(!intact(&opened));
    }
}
