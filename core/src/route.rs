//! One routing question, asked of the kernel (rtnetlink `RTM_GETROUTE`)
//! inside a netns: would a packet to this address, carrying this mark, be
//! delivered locally? The ztunnel asks it before dialing an app from a
//! client's address: the app's replies carry the reply mark, and only
//! where the node agent installed the pod's reply routing does the answer
//! say "local" (see `mesh_cni::orig_src`).

use std::io::{self, Read};
use std::net::IpAddr;

use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

/// How long the kernel's answer is waited for (it comes at once).
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_millis(100);

/// `struct nlmsghdr` (16 bytes) then `struct rtmsg` (12 bytes).
const HEADER: usize = 16;
const RTMSG: usize = 12;

/// One route attribute: length, type, the value padded to 4 bytes.
fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// The request: the route to `dst` (a host route's length) for a packet
/// with `mark`.
fn request(dst: IpAddr, mark: u32) -> Vec<u8> {
    let (family, bits, octets) = match dst {
        IpAddr::V4(a) => (libc::AF_INET, 32u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6, 128u8, a.octets().to_vec()),
    };
    let mut b = vec![0u8; HEADER];
    b[4..6].copy_from_slice(&libc::RTM_GETROUTE.to_ne_bytes());
    b[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    b[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence
    let mut rt = [0u8; RTMSG];
    rt[0] = family as u8;
    rt[1] = bits;
    b.extend_from_slice(&rt);
    attr(&mut b, libc::RTA_DST, &octets);
    attr(&mut b, libc::RTA_MARK, &mark.to_ne_bytes());
    let len = b.len() as u32;
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b
}

/// Reads the answer: `Some(true)` for a local route, `Some(false)` for
/// another route or none (an error answer such as "unreachable"), None
/// for something that is not an answer.
fn local_in(answer: &[u8]) -> Option<bool> {
    let kind = u16::from_ne_bytes(answer.get(4..6)?.try_into().ok()?);
    match kind {
        libc::RTM_NEWROUTE => Some(*answer.get(HEADER + 7)? == libc::RTN_LOCAL),
        k if k == libc::NLMSG_ERROR as u16 => Some(false),
        _ => None,
    }
}

/// Whether the kernel of `netns` (this one when None) delivers a packet to
/// `dst` carrying `mark` locally. An error is an error of asking (no
/// netns, no sockets left: EMFILE, no answer within 100 ms), never "no".
/// Cost: one netns switch there and back, one netlink socket, one send
/// and one read: 7 system calls (see docs/architecture.md).
pub fn delivered_locally(dst: IpAddr, mark: u32, netns: Option<&Netns>) -> io::Result<bool> {
    let open = || {
        Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::RAW,
            Some(Protocol::from(libc::NETLINK_ROUTE)),
        )
    };
    let sock = match netns {
        Some(ns) => ns.run(open)??,
        None => open()?,
    };
    // The kernel answers a route query before the send returns; should it
    // not, the tokio worker this runs on waits no longer than this.
    sock.set_read_timeout(Some(ANSWER_WITHIN))?;
    sock.send(&request(dst, mark))?;
    let mut buf = [0u8; 1024];
    let n = (&sock).read(&mut buf)?;
    local_in(&buf[..n]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the kernel's answer to a route query is not a route",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses_are_delivered_locally_and_others_are_not() {
        for (ip, local) in [
            ("127.0.0.1", true),
            ("::1", true),
            ("192.0.2.1", false),
            ("2001:db8::1", false),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            // A host without IPv6 answers "no route": not local either.
            assert_eq!(
                delivered_locally(ip, 0, None).unwrap_or(false),
                local,
                "{ip}"
            );
        }
    }
}
