//! Network namespaces: a pod's netns, held by its file descriptor, and a way
//! to create sockets inside it.
//!
//! A socket belongs to the netns it was created in, whatever thread uses it
//! later. So the proxy briefly switches the calling thread into the pod's
//! netns (setns), creates the socket, and switches back, all synchronously:
//! nothing else runs on the thread in between, and the socket is then used
//! from the shared runtime like any other.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::OnceLock;

/// A network namespace, kept alive by its descriptor.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    /// Device/inode of the namespace: its identity.
    id: (u64, u64),
}

fn ns_id(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    let f = File::from(fd.try_clone()?);
    let m = f.metadata()?;
    use std::os::unix::fs::MetadataExt;
    Ok((m.dev(), m.ino()))
}

/// The netns this process started in (where the node's own sockets live).
fn host() -> io::Result<&'static Netns> {
    static HOST: OnceLock<Netns> = OnceLock::new();
    if let Some(n) = HOST.get() {
        return Ok(n);
    }
    let n = Netns::open("/proc/self/ns/net")?;
    Ok(HOST.get_or_init(|| n))
}

fn setns(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: setns(2) with a valid netns descriptor and CLONE_NEWNET; it
    // only changes the calling thread's network namespace.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Netns {
    /// Opens a netns by path (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`).
    pub fn open(path: &str) -> io::Result<Netns> {
        let fd: OwnedFd = File::open(path)?.into();
        Netns::from_fd(fd)
    }

    /// Takes a netns descriptor (as handed over by the node agent).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Netns> {
        let id = ns_id(&fd)?;
        Ok(Netns { fd, id })
    }

    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The addresses on the netns's interfaces, loopback and link-local
    /// left out (they are no pod's).
    pub fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        self.run(interface_addresses)?
    }

    /// Runs `f` with the calling thread inside this netns, then returns the
    /// thread to the host netns. `f` must not block or yield.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let host = host()?;
        if host.id == self.id {
            return Ok(f());
        }
        setns(&self.fd)?;
        // Back to the host netns however `f` ends, a panic included: a runtime
        // thread left in a pod's netns would open later sockets there.
        struct Back(&'static Netns);
        impl Drop for Back {
            fn drop(&mut self) {
                if let Err(e) = setns(&self.0.fd) {
                    eprintln!("fatal: cannot return to the host network namespace: {e}");
                    std::process::abort();
                }
            }
        }
        let _back = Back(host);
        Ok(f())
    }
}

/// The netns of each captured pod, by namespace and name, so upstream
/// sockets for a workload are made inside its pod. Nested by namespace so a
/// lookup (several per connection) borrows the workload's names instead of
/// building a key.
#[derive(Default)]
pub struct NetnsRegistry {
    pods: std::sync::RwLock<
        std::collections::HashMap<String, std::collections::HashMap<String, std::sync::Arc<Netns>>>,
    >,
}

impl NetnsRegistry {
    pub fn insert(&self, namespace: &str, name: &str, netns: std::sync::Arc<Netns>) {
        self.pods
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(namespace.to_string())
            .or_default()
            .insert(name.to_string(), netns);
    }

    /// Removes the entry only if it is still `netns`: a pod recreated under
    /// the same name has registered its own by then.
    pub fn remove(&self, namespace: &str, name: &str, netns: &std::sync::Arc<Netns>) -> bool {
        let mut pods = self.pods.write().unwrap_or_else(|p| p.into_inner());
        let Some(names) = pods.get_mut(namespace) else {
            return false;
        };
        if !names
            .get(name)
            .is_some_and(|n| std::sync::Arc::ptr_eq(n, netns))
        {
            return false;
        }
        names.remove(name);
        if names.is_empty() {
            pods.remove(namespace);
        }
        true
    }

    /// The netns of a captured workload; None outside node mode.
    pub fn for_workload(&self, w: &crate::state::Workload) -> Option<std::sync::Arc<Netns>> {
        self.get(&w.namespace, &w.name)
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<std::sync::Arc<Netns>> {
        let pods = self.pods.read().unwrap_or_else(|p| p.into_inner());
        pods.get(namespace)?.get(name).cloned()
    }
}

fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs(3) fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned; its
        // `ifa_addr`, when set, points at a sockaddr of the family it names.
        unsafe {
            let a = (*cur).ifa_addr;
            if !a.is_null() {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(a as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(a as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: frees the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(head) };
    // The calling thread's netns (it runs inside the pod's); unreadable
    // (no IPv6) is none failed.
    let failed = std::fs::read_to_string("/proc/thread-self/net/if_inet6")
        .map(|t| dad_failed(&t))
        .unwrap_or_default();
    out.retain(|a| match a {
        IpAddr::V6(v) if failed.contains(v) => false,
        IpAddr::V4(v) => !v.is_loopback() && !v.is_link_local(),
        IpAddr::V6(v) => !v.is_loopback() && !v.is_unicast_link_local(),
    });
    Ok(out)
}

/// The IPv6 addresses of `/proc/net/if_inet6` whose duplicate address
/// detection failed (IFA_F_DADFAILED): never usable, so no listener is
/// bound there. A tentative one (DAD still running) is kept: it becomes
/// usable within a few seconds, and a bind that fails meanwhile is tried
/// again (or the pod's capture is).
fn dad_failed(if_inet6: &str) -> Vec<std::net::Ipv6Addr> {
    const IFA_F_DADFAILED: u32 = 0x08;
    if_inet6
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(4)?, 16).ok()?;
            if flags & IFA_F_DADFAILED == 0 {
                return None;
            }
            u128::from_str_radix(f.first()?, 16)
                .ok()
                .map(std::net::Ipv6Addr::from)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv6 address whose DAD failed is no pod's (a bind there fails
    /// forever); one still tentative, or usable, is.
    #[test]
    fn an_address_that_failed_dad_is_left_out() {
        let t = "fd000000000000000000000000000005 02 40 00 c8 eth0
fd000000000000000000000000000006 02 40 00 c0 eth0
fd000000000000000000000000000007 02 40 00 80 eth0
";
        let failed = dad_failed(t);
        assert_eq!(failed, ["fd00::5".parse::<std::net::Ipv6Addr>().unwrap()]);
    }
    use std::sync::Arc;

    /// A pod recreated under the same name keeps its own entry when the
    /// old pod's removal arrives late; the last pod of a namespace takes
    /// the namespace with it.
    #[test]
    fn a_recreated_pod_keeps_its_entry_and_removal_cleans_up() {
        let own = || Arc::new(Netns::open("/proc/self/ns/net").expect("own netns"));
        let reg = NetnsRegistry::default();
        let (old, new) = (own(), own());
        reg.insert("shop", "db-0", old.clone());
        reg.insert("shop", "web", own());
        reg.insert("shop", "db-0", new.clone());
        assert!(!reg.remove("shop", "db-0", &old), "stale removal");
        assert!(Arc::ptr_eq(&reg.get("shop", "db-0").expect("kept"), &new));
        assert!(reg.get("other", "db-0").is_none());
        assert!(reg.remove("shop", "db-0", &new));
        assert!(reg.get("shop", "db-0").is_none());
        let web = reg.get("shop", "web").expect("web");
        assert!(reg.remove("shop", "web", &web));
        assert!(reg.pods.read().expect("lock").is_empty());
    }
}
