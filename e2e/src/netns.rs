//! Network namespaces for tests: unique names, removed on drop (also when
//! the test fails), and a raw capture of what crosses an interface.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mesh_core::netns::Netns;

/// Runs a command, panicking with its output when it fails.
pub fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A short unique prefix (interface names are at most 15 bytes).
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "m{}{}{tag}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Named network namespaces that are deleted when this is dropped.
#[derive(Default)]
pub struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    pub fn add(&mut self, name: &str) -> Netns {
        run(&["ip", "netns", "add", name]);
        self.names.push(name.to_string());
        run(&["ip", "-n", name, "link", "set", "lo", "up"]);
        Netns::open(&format!("/var/run/netns/{name}")).expect("open netns")
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Joins two namespaces with a veth pair and addresses on one /24.
pub fn veth(a_ns: &str, a_if: &str, a_ip: &str, b_ns: &str, b_if: &str, b_ip: &str) {
    run(&[
        "ip", "link", "add", a_if, "netns", a_ns, "type", "veth", "peer", b_if, "netns", b_ns,
    ]);
    run(&[
        "ip",
        "-n",
        a_ns,
        "addr",
        "add",
        &format!("{a_ip}/24"),
        "dev",
        a_if,
    ]);
    run(&[
        "ip",
        "-n",
        b_ns,
        "addr",
        "add",
        &format!("{b_ip}/24"),
        "dev",
        b_if,
    ]);
    run(&["ip", "-n", a_ns, "link", "set", a_if, "up"]);
    run(&["ip", "-n", b_ns, "link", "set", b_if, "up"]);
}

/// The source and destination ports of an Ethernet frame holding TCP over
/// IPv4 or IPv6 (no extension headers), and whether it is IPv6.
fn tcp_ports(f: &[u8]) -> Option<([u16; 2], bool)> {
    let (t, v6) = match (f.get(12..14)?, f.get(14)?) {
        ([0x08, 0x00], b) if *f.get(14 + 9)? == 6 => (14 + ((b & 0x0f) as usize) * 4, false),
        ([0x86, 0xdd], _) if *f.get(14 + 6)? == 6 => (14 + 40, true),
        _ => return None,
    };
    let p = f.get(t..t + 4)?;
    Some((
        [
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ],
        v6,
    ))
}

/// What a capture saw.
#[derive(Debug, Default)]
pub struct Captured {
    pub frames: usize,
    /// TCP segments to or from port 15008 (IPv4 and IPv6).
    pub hbone: usize,
    /// Those of them carried over IPv6.
    pub hbone6: usize,
    /// Frames containing the marker bytes.
    pub marker: usize,
}

/// Captures frames on `ifname` inside `netns` for `dur` (AF_PACKET), counting
/// HBONE segments and frames that contain `marker`.
pub fn capture(
    netns: &Netns,
    ifname: &str,
    dur: Duration,
    marker: &[u8],
) -> std::io::Result<Captured> {
    let fd = netns.run(|| {
        // SAFETY: plain socket(2)/bind(2)/setsockopt(2) calls on a descriptor
        // we own; the structs are zero-initialised and fully set.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let name = std::ffi::CString::new(ifname).expect("ifname");
            let idx = libc::if_nametoindex(name.as_ptr());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = idx as i32;
            if libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) != 0
            {
                libc::close(fd);
                return Err(std::io::Error::last_os_error());
            }
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Ok(fd)
        }
    })??;
    let mut out = Captured::default();
    let mut buf = vec![0u8; 65536];
    let end = Instant::now() + dur;
    while Instant::now() < end {
        // SAFETY: recv(2) into a buffer we own, of the length we pass.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let f = &buf[..n as usize];
        out.frames += 1;
        if f.windows(marker.len()).any(|w| w == marker) {
            out.marker += 1;
        }
        if let Some((ports, v6)) = tcp_ports(f)
            && ports.contains(&15008)
        {
            out.hbone += 1;
            out.hbone6 += v6 as usize;
        }
    }
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    Ok(out)
}
