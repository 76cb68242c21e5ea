//! Connections queued on a listener that closes go to another listener of
//! its SO_REUSEPORT set instead of being reset: `net.ipv4.tcp_migrate_req`
//! (Linux 5.14 and later), a setting of each network namespace, which the
//! agent turns on in every pod it captures. A ztunnel roll relies on it: the
//! new ztunnel binds each pod's listeners beside the old one's, then the old
//! one closes its own, and a connection the kernel had just queued on one of
//! them would otherwise be refused.

use std::io;

use mesh_core::netns::Netns;

/// The setting, as the thread that opens it sees it: in the netns the
/// thread is in.
const SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Turns the migration on in `netns`.
pub fn enable(netns: &Netns) -> io::Result<()> {
    netns.run(|| std::fs::write(SYSCTL, b"1"))?
}

/// Whether it is on in `netns`.
pub fn enabled(netns: &Netns) -> io::Result<bool> {
    let v = netns.run(|| std::fs::read_to_string(SYSCTL))??;
    Ok(v.trim() == "1")
}
