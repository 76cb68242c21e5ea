//! Connections queued on a listener that closes go to another listener of
//! its SO_REUSEPORT set instead of being reset: `net.ipv4.tcp_migrate_req`
//! (Linux 5.14 and later). A ztunnel roll relies on it: the new ztunnel
//! binds each pod's listeners beside the old one's, then the old one closes
//! its own, and a connection the kernel had just queued on one of them
//! would otherwise be refused.
//!
//! The setting belongs to each network namespace (a new one starts at 0,
//! whatever the node's is), and the listeners are in the pods' namespaces:
//! so the agent, the privileged one on the node, writes it in each pod it
//! captures (and again for the pods it finds on a restart), from a thread
//! that entered the pod's netns (`/proc/sys/net` shows the netns of the
//! thread that opens it). A container that is not privileged has /proc/sys
//! mounted read-only: the write then fails, which the agent logs and goes
//! on (the pod is captured; only a roll may reset a queued connection).

use mesh_core::netns::Netns;

/// The setting, as the thread that opens it sees it: in the netns the
/// thread is in.
const SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot enter the pod's netns: {0}")]
    Enter(#[source] std::io::Error),
    /// Read-only /proc/sys (an unprivileged container), or a kernel before
    /// 5.14 (no such file).
    #[error("{SYSCTL} in the pod's netns: {0}")]
    Sysctl(#[source] std::io::Error),
}

/// Turns the migration on in `netns`.
pub fn enable(netns: &Netns) -> Result<(), MigrateError> {
    netns
        .run(|| std::fs::write(SYSCTL, b"1"))
        .map_err(MigrateError::Enter)?
        .map_err(MigrateError::Sysctl)
}

/// Whether it is on in `netns`.
pub fn enabled(netns: &Netns) -> Result<bool, MigrateError> {
    let v = netns
        .run(|| std::fs::read_to_string(SYSCTL))
        .map_err(MigrateError::Enter)?
        .map_err(MigrateError::Sysctl)?;
    Ok(v.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netns of its own (`ip netns`), deleted on drop.
    struct Scratch(String);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    /// The setting is the pod's netns' own: on there, the node's untouched.
    #[test]
    fn it_is_turned_on_in_the_pods_netns_only() {
        let name = format!("mig-{}", std::process::id());
        let made = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip runs");
        assert!(made.success(), "ip netns add {name} (needs root)");
        let scratch = Scratch(name);
        let ours = std::fs::read_to_string(SYSCTL).expect("our own setting");
        let pod = Netns::open(&format!("/var/run/netns/{}", scratch.0)).expect("the netns");
        assert_eq!(enabled(&pod).ok(), Some(false), "a new netns starts off");
        enable(&pod).expect("written");
        assert_eq!(enabled(&pod).ok(), Some(true));
        assert_eq!(std::fs::read_to_string(SYSCTL).ok(), Some(ours));
    }
}
