//! Whose sockets hold a captured pod's listener ports (15001, 15006,
//! 15008, and 15053 when DNS is redirected).
//!
//! A ztunnel's ack says it bound them, or (in a snapshot, beside an older
//! ztunnel that held them exclusively) that the port was in use. Neither
//! says whose the sockets on those ports are: a process in the pod could
//! have bound one in a gap (nothing listening) or joined a `SO_REUSEPORT`
//! set. So before a ztunnel's snapshot counts a pod as taken, the agent
//! looks itself: every socket listening on those ports in the pod's netns
//! (`/proc/thread-self/net/{tcp,tcp6,udp,udp6}` read from inside it) must
//! be one a connected ztunnel's process holds (the socket's inode among the
//! `/proc/<pid>/fd` links of the ZDS peers' pids), and each port must have
//! one. Anything else, including a pid the agent cannot see, is a refusal.

use std::collections::HashSet;

use mesh_core::config::{DNS_PORT, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use mesh_core::netns::Netns;

/// Why a pod's ports are not (all) held by the connected ztunnels.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HolderError {
    #[error("nothing listens on the pod's port {0}")]
    Unheld(u16),
    #[error(
        "the pod's port {port} is held by a socket no connected ztunnel holds ({proto} {local}, inode {inode}): a process of the pod's?"
    )]
    Foreign {
        port: u16,
        proto: &'static str,
        local: String,
        inode: u64,
    },
    #[error("reading the pod's sockets: {0}")]
    Read(#[source] std::io::Error),
}

/// One socket bound to one of the pod's ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bound {
    pub(crate) proto: &'static str,
    pub(crate) local: String,
    pub(crate) port: u16,
    pub(crate) inode: u64,
}

/// The ports a pod's ztunnel listens on.
pub(crate) fn ports(dns: bool) -> Vec<u16> {
    let mut p = vec![OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT];
    if dns {
        p.push(DNS_PORT);
    }
    p
}

/// The sockets of one `/proc/net/{tcp,udp}[6]` table on `ports`: TCP
/// listeners (state 0A) only, UDP sockets whatever their state.
pub(crate) fn parse(proto: &'static str, text: &str, ports: &[u16]) -> Vec<Bound> {
    let tcp = proto.starts_with("tcp");
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, st, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            if !ports.contains(&port) || (tcp && *st != "0A") {
                return None;
            }
            Some(Bound {
                proto,
                local: local.to_string(),
                port,
                inode: inode.parse().ok()?,
            })
        })
        .collect()
}

/// The sockets on `ports` in `netns`.
fn pod_sockets(netns: &Netns, ports: &[u16]) -> Result<Vec<Bound>, HolderError> {
    let read = || -> std::io::Result<Vec<Bound>> {
        let mut all = Vec::new();
        for proto in ["tcp", "tcp6", "udp", "udp6"] {
            match std::fs::read_to_string(format!("/proc/thread-self/net/{proto}")) {
                Ok(text) => all.extend(parse(proto, &text, ports)),
                // No IPv6 in the pod: no such table.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(all)
    };
    netns.run(read).and_then(|r| r).map_err(HolderError::Read)
}

/// The socket inodes process `pid` holds; empty when it cannot be seen.
fn socket_inodes(pid: i32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?.to_string();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Checks that the sockets on the pod's ports are all held by the
/// processes `pids` (the connected ztunnels), and that each port has one.
pub(crate) fn check(netns: &Netns, dns: bool, pids: &[i32]) -> Result<(), HolderError> {
    let ports = ports(dns);
    let sockets = pod_sockets(netns, &ports)?;
    let ours: HashSet<u64> = pids.iter().flat_map(|p| socket_inodes(*p)).collect();
    verdict(&sockets, &ports, &ours)
}

/// [`check`]'s verdict on what was read.
pub(crate) fn verdict(
    sockets: &[Bound],
    ports: &[u16],
    ours: &HashSet<u64>,
) -> Result<(), HolderError> {
    if let Some(b) = sockets.iter().find(|b| !ours.contains(&b.inode)) {
        return Err(HolderError::Foreign {
            port: b.port,
            proto: b.proto,
            local: b.local.clone(),
            inode: b.inode,
        });
    }
    match ports
        .iter()
        .find(|p| !sockets.iter().any(|b| b.port == **p))
    {
        Some(p) => Err(HolderError::Unheld(*p)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 100 0 0 10 0
   1: 0A000005:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 100 0 0 10 0
   2: 0A000005:3AA0 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 100 0 0 10 0
   3: 0A000005:3A9E 0A000009:C350 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
   4: 0A000005:2328 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 444 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn only_listeners_on_the_pods_ports_are_read() {
        let got = parse("tcp", TCP, &ports(false));
        let inodes: Vec<u64> = got.iter().map(|b| b.inode).collect();
        assert_eq!(inodes, [111, 222, 333]);
        assert_eq!(got[0].port, 15001);
    }

    /// `[::1]:15001`, `[fd00:10:1:1::5]:15006` and `:15008` (the ztunnel's),
    /// and `[fd00:10:1:1::5]:15006` again (another socket: a process of the
    /// pod's in the set).
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:3A99 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 611 1 0000000000000000 100 0 0 10 0
   1: 000000FD01001000010000000500000000:3A9E 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 622 1 0000000000000000 100 0 0 10 0
   2: 000000FD01001000010000000500000000:3AA0 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 633 1 0000000000000000 100 0 0 10 0
   3: 000000FD01001000010000000500000000:3A9E 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 644 1 0000000000000000 100 0 0 10 0
";

    /// A process of the pod holding its IPv6 address's 15006 is seen as
    /// one holding the IPv4 one's is.
    #[test]
    fn an_ipv6_socket_no_ztunnel_holds_is_refused() {
        let mut got = parse("tcp", TCP, &ports(false));
        got.extend(parse("tcp6", TCP6, &ports(false)));
        let ours: HashSet<u64> = [111, 222, 333, 611, 622, 633].into();
        assert!(matches!(
            verdict(&got, &ports(false), &ours),
            Err(HolderError::Foreign {
                port: 15006,
                proto: "tcp6",
                inode: 644,
                ..
            })
        ));
        let all: HashSet<u64> = ours.iter().copied().chain([644]).collect();
        assert!(verdict(&got, &ports(false), &all).is_ok());
    }

    #[test]
    fn a_socket_no_ztunnel_holds_or_a_port_without_one_is_refused() {
        let got = parse("tcp", TCP, &ports(false));
        let all: HashSet<u64> = [111, 222, 333].into();
        assert!(verdict(&got, &ports(false), &all).is_ok());
        let some: HashSet<u64> = [111, 333].into();
        assert!(matches!(
            verdict(&got, &ports(false), &some),
            Err(HolderError::Foreign {
                port: 15006,
                inode: 222,
                ..
            })
        ));
        assert!(matches!(
            verdict(&got, &ports(true), &all),
            Err(HolderError::Unheld(15053))
        ));
        assert!(matches!(
            verdict(&got[..2], &ports(false), &all),
            Err(HolderError::Unheld(15008))
        ));
    }
}
