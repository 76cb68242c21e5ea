//! Whose sockets hold a captured pod's listener ports where its redirects
//! land.
//!
//! A ztunnel's ack says it bound them, or (in a snapshot, beside an older
//! ztunnel that held them exclusively) that the port was in use. Neither
//! says whose the sockets on those ports are: a process in the pod could
//! have bound one in a gap (nothing listening) or joined a `SO_REUSEPORT`
//! set. So the agent looks itself, from inside the pod's netns
//! (`/proc/thread-self/net/{tcp,tcp6,udp,udp6}`), at the sockets that could
//! receive the pod's captured traffic ([`reachable`]): TCP listeners on
//! 15001 at 127.0.0.1 or ::1 (the output chain's REDIRECT), on 15006 (unless
//! inbound capture is bypassed) and 15008 at the pod's own addresses (the
//! prerouting REDIRECT, HBONE peers), TCP and UDP on 15053 at loopback when
//! DNS is captured; on those ports the wildcard (0.0.0.0, ::, whether
//! IPv6-only or not) too, and an IPv4-mapped IPv6 address as its IPv4 one.
//! A socket elsewhere (UDP on 15008, TCP at 127.0.0.2:15001) gets nothing
//! redirected and is left alone. Each such socket must be one a connected
//! ztunnel's process holds (its inode among the `/proc/<pid>/fd` links of
//! the ZDS peers' pids), and each port must have one of the newest
//! ztunnel's. Anything else, including a pid the agent cannot see, fences
//! the pod ([`crate::agent::fenced`]).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use mesh_core::config::{DNS_PORT, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use mesh_core::netns::Netns;

/// Why a pod's ports are not (all) held by the connected ztunnels.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HolderError {
    #[error("the newest ztunnel listens on none of the pod's port {0} where its redirects land")]
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
    /// Its address (an IPv4-mapped one as IPv4); None: unreadable.
    pub(crate) ip: Option<IpAddr>,
    pub(crate) port: u16,
    pub(crate) inode: u64,
}

/// Where a pod's redirects land.
#[derive(Debug, Clone, Default)]
pub(crate) struct Targets {
    /// DNS is captured (15053).
    pub(crate) dns: bool,
    /// Inbound plaintext is captured (15006): not bypassed.
    pub(crate) inbound: bool,
    /// The pod's own addresses.
    pub(crate) ips: Vec<IpAddr>,
}

impl Targets {
    /// The ports a redirect lands on.
    pub(crate) fn ports(&self) -> Vec<u16> {
        let mut p = vec![OUTBOUND_PORT];
        if self.inbound {
            p.push(INBOUND_PLAINTEXT_PORT);
        }
        p.push(HBONE_PORT);
        if self.dns {
            p.push(DNS_PORT);
        }
        p
    }
}

/// The ports a pod's ztunnel listens on.
pub(crate) fn ports(dns: bool) -> Vec<u16> {
    let mut p = vec![OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT];
    if dns {
        p.push(DNS_PORT);
    }
    p
}

/// An address of `/proc/net/{tcp,udp}[6]`: the kernel prints each 32-bit
/// word in the host's byte order.
fn hex_ip(text: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(text.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match text.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(b);
            Some(match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            })
        }
        _ => None,
    }
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
            let (addr, port) = local.rsplit_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            if !ports.contains(&port) || (tcp && *st != "0A") {
                return None;
            }
            Some(Bound {
                proto,
                local: local.to_string(),
                ip: hex_ip(addr),
                port,
                inode: inode.parse().ok()?,
            })
        })
        .collect()
}

/// Whether `b` could receive traffic the pod's rules redirect (or HBONE
/// addressed to the pod). An address that cannot be read counts.
pub(crate) fn reachable(b: &Bound, t: &Targets) -> bool {
    let Some(ip) = b.ip else { return true };
    let tcp = b.proto.starts_with("tcp");
    let loopback = ip == IpAddr::V4(Ipv4Addr::LOCALHOST) || ip == IpAddr::V6(Ipv6Addr::LOCALHOST);
    let at = |redirected: bool| ip.is_unspecified() || redirected;
    match b.port {
        OUTBOUND_PORT if tcp => at(loopback),
        DNS_PORT if t.dns => at(loopback),
        INBOUND_PLAINTEXT_PORT if tcp && t.inbound => at(t.ips.contains(&ip)),
        HBONE_PORT if tcp => at(t.ips.contains(&ip)),
        _ => false,
    }
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

/// The socket inodes process `pid` holds; None when they cannot be seen.
fn socket_inodes(pid: i32) -> Option<HashSet<u64>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let inodes = dir
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?.to_string();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    Some(inodes)
}

/// The connected ztunnels' sockets, read once for a whole round of
/// checks: all of theirs, and the newest one's.
#[derive(Debug, Default)]
pub(crate) struct Ours {
    pub(crate) all: HashSet<u64>,
    pub(crate) newest: HashSet<u64>,
    /// Whether the newest one's sockets could be read (its pid known and
    /// its `/proc/<pid>/fd` readable).
    pub(crate) newest_seen: bool,
}

impl Ours {
    /// From the connected ztunnels' `pids` and the newest one's.
    pub(crate) fn read(pids: &[i32], newest: Option<i32>) -> Ours {
        let newest = newest.and_then(socket_inodes);
        let newest_seen = newest.is_some();
        let newest = newest.unwrap_or_default();
        let mut all: HashSet<u64> = pids
            .iter()
            .filter_map(|p| socket_inodes(*p))
            .flatten()
            .collect();
        all.extend(newest.iter().copied());
        Ours {
            all,
            newest,
            newest_seen,
        }
    }
}

/// Checks a pod: see the module's doc. `ips`: its addresses as the agent
/// knows them (those read from its netns now are added).
pub(crate) fn check(
    netns: &Netns,
    dns: bool,
    bypass_inbound: bool,
    ips: &[IpAddr],
    ours: &Ours,
) -> Result<(), HolderError> {
    let mut own = netns.addresses().map_err(HolderError::Read)?;
    own.extend(ips.iter().copied());
    let t = Targets {
        dns,
        inbound: !bypass_inbound,
        ips: own,
    };
    let sockets = pod_sockets(netns, &ports(dns))?;
    verdict(&sockets, &t, ours)
}

/// Whether a connected ztunnel holds any socket on the pod's listener
/// ports (a read that fails is none).
pub(crate) fn any_ztunnels(netns: &Netns, dns: bool, ours: &Ours) -> bool {
    pod_sockets(netns, &ports(dns)).is_ok_and(|s| s.iter().any(|b| ours.all.contains(&b.inode)))
}

/// [`check`]'s verdict on what was read.
pub(crate) fn verdict(sockets: &[Bound], t: &Targets, ours: &Ours) -> Result<(), HolderError> {
    let relevant: Vec<&Bound> = sockets.iter().filter(|b| reachable(b, t)).collect();
    if let Some(b) = relevant.iter().find(|b| !ours.all.contains(&b.inode)) {
        return Err(HolderError::Foreign {
            port: b.port,
            proto: b.proto,
            local: b.local.clone(),
            inode: b.inode,
        });
    }
    let held = |p: u16| {
        relevant
            .iter()
            .any(|b| b.port == p && ours.newest.contains(&b.inode))
    };
    match t.ports().into_iter().find(|p| !held(*p)) {
        Some(p) => Err(HolderError::Unheld(p)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 100 0 0 10 0
   1: 0500000A:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 100 0 0 10 0
   2: 0500000A:3AA0 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 100 0 0 10 0
   3: 0500000A:3A9E 0900000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
   4: 0500000A:2328 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 444 1 0000000000000000 100 0 0 10 0
";

    /// 10.0.0.5 and fd00:10:1:1::5.
    fn targets(dns: bool) -> Targets {
        Targets {
            dns,
            inbound: true,
            ips: vec![
                "10.0.0.5".parse().unwrap(),
                "fd00:10:1:1::5".parse().unwrap(),
            ],
        }
    }

    fn ours(all: &[u64]) -> Ours {
        let all: HashSet<u64> = all.iter().copied().collect();
        Ours {
            newest: all.clone(),
            all,
            newest_seen: true,
        }
    }

    #[test]
    fn only_listeners_on_the_pods_ports_are_read() {
        let got = parse("tcp", TCP, &ports(false));
        let inodes: Vec<u64> = got.iter().map(|b| b.inode).collect();
        assert_eq!(inodes, [111, 222, 333]);
        assert_eq!(got[0].port, 15001);
        assert_eq!(got[0].ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(got[1].ip, Some("10.0.0.5".parse().unwrap()));
    }

    /// `[::1]:15001`, `[fd00:10:1:1::5]:15006` and `:15008` (the ztunnel's),
    /// and `[fd00:10:1:1::5]:15006` again (another socket: a process of the
    /// pod's in the set).
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:3A99 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 611 1 0000000000000000 100 0 0 10 0
   1: 100000FD010001000000000005000000:3A9E 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 622 1 0000000000000000 100 0 0 10 0
   2: 100000FD010001000000000005000000:3AA0 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 633 1 0000000000000000 100 0 0 10 0
   3: 100000FD010001000000000005000000:3A9E 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 644 1 0000000000000000 100 0 0 10 0
";

    /// A process of the pod holding its IPv6 address's 15006 is seen as
    /// one holding the IPv4 one's is.
    #[test]
    fn an_ipv6_socket_no_ztunnel_holds_is_refused() {
        let mut got = parse("tcp", TCP, &ports(false));
        got.extend(parse("tcp6", TCP6, &ports(false)));
        assert_eq!(got[3].ip, Some("::1".parse().unwrap()));
        assert_eq!(got[4].ip, Some("fd00:10:1:1::5".parse().unwrap()));
        let mine = ours(&[111, 222, 333, 611, 622, 633]);
        assert!(matches!(
            verdict(&got, &targets(false), &mine),
            Err(HolderError::Foreign {
                port: 15006,
                proto: "tcp6",
                inode: 644,
                ..
            })
        ));
        let all = ours(&[111, 222, 333, 611, 622, 633, 644]);
        assert!(verdict(&got, &targets(false), &all).is_ok());
    }

    #[test]
    fn a_socket_no_ztunnel_holds_or_a_port_without_one_is_refused() {
        let got = parse("tcp", TCP, &ports(false));
        let all = ours(&[111, 222, 333]);
        assert!(verdict(&got, &targets(false), &all).is_ok());
        assert!(matches!(
            verdict(&got, &targets(false), &ours(&[111, 333])),
            Err(HolderError::Foreign {
                port: 15006,
                inode: 222,
                ..
            })
        ));
        assert!(matches!(
            verdict(&got, &targets(true), &all),
            Err(HolderError::Unheld(15053))
        ));
        assert!(matches!(
            verdict(&got[..2], &targets(false), &all),
            Err(HolderError::Unheld(15008))
        ));
    }

    fn bound(proto: &'static str, addr: &str) -> Bound {
        let a: std::net::SocketAddr = addr.parse().unwrap();
        Bound {
            proto,
            local: addr.to_string(),
            ip: Some(a.ip()),
            port: a.port(),
            inode: 9,
        }
    }

    /// Only a socket a redirect (or an HBONE peer) could reach counts: a
    /// pod's process elsewhere on those ports holds nothing back. Failed
    /// first: every socket on the ports was a holder.
    #[test]
    fn only_sockets_a_redirect_reaches_count() {
        let t = targets(true);
        for (proto, addr) in [
            ("tcp", "127.0.0.1:15001"),
            ("tcp", "0.0.0.0:15001"),
            ("tcp6", "[::1]:15001"),
            ("tcp6", "[::]:15001"),
            ("tcp", "10.0.0.5:15006"),
            ("tcp6", "[fd00:10:1:1::5]:15006"),
            ("tcp", "0.0.0.0:15008"),
            ("tcp6", "[fd00:10:1:1::5]:15008"),
            ("tcp", "127.0.0.1:15053"),
            ("udp", "127.0.0.1:15053"),
            ("udp", "0.0.0.0:15053"),
            ("udp6", "[::1]:15053"),
        ] {
            assert!(reachable(&bound(proto, addr), &t), "{proto} {addr}");
        }
        for (proto, addr) in [
            ("udp", "0.0.0.0:15008"),
            ("udp", "0.0.0.0:15001"),
            ("tcp", "127.0.0.2:15001"),
            ("tcp", "10.0.0.5:15001"),
            ("tcp6", "[::1]:15006"),
            ("tcp", "127.0.0.1:15008"),
            ("tcp", "10.0.0.9:15006"),
            ("udp", "10.0.0.5:15053"),
        ] {
            assert!(!reachable(&bound(proto, addr), &t), "{proto} {addr}");
        }
        // DNS not captured, inbound bypassed: those ports are no targets.
        let off = Targets {
            dns: false,
            inbound: false,
            ..targets(false)
        };
        assert!(!reachable(&bound("udp", "127.0.0.1:15053"), &off));
        assert!(!reachable(&bound("tcp", "10.0.0.5:15006"), &off));
        assert_eq!(off.ports(), [15001, 15008]);
        // An unreadable address counts.
        let mut b = bound("tcp", "127.0.0.2:15001");
        b.ip = None;
        assert!(reachable(&b, &t));
        // And a verdict over sockets elsewhere is the ztunnel's alone.
        let got = vec![
            bound("tcp", "127.0.0.1:15001"),
            bound("udp", "0.0.0.0:15008"),
            bound("tcp", "127.0.0.2:15001"),
        ];
        let mut mine = ours(&[]);
        mine.all.insert(1);
        mine.newest.insert(1);
        let mut got = got;
        got[0].inode = 1;
        let hbone = Bound {
            inode: 1,
            ..bound("tcp", "10.0.0.5:15008")
        };
        got.push(hbone);
        let t = Targets {
            inbound: false,
            ..targets(false)
        };
        assert!(
            verdict(&got, &t, &mine).is_ok(),
            "{:?}",
            verdict(&got, &t, &mine)
        );
    }

    /// An IPv4-mapped IPv6 address is its IPv4 one.
    #[test]
    fn a_v4_mapped_address_is_read_as_ipv4() {
        assert_eq!(
            hex_ip("0000000000000000FFFF00000100007F"),
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(hex_ip("bogus"), None);
    }

    /// The ports held only by an older ztunnel (the newest one deferred its
    /// bind) do not count as the newest one's.
    #[test]
    fn ports_only_an_older_ztunnel_holds_are_unheld() {
        let got = parse("tcp", TCP, &ports(false));
        let older = Ours {
            all: [111, 222, 333].into(),
            newest: HashSet::new(),
            newest_seen: true,
        };
        assert!(matches!(
            verdict(&got, &targets(false), &older),
            Err(HolderError::Unheld(15001))
        ));
    }
}
